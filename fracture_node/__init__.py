"""fracture-node: a DICOM node that reads bone radiographs for fractures."""

__version__ = "0.1.0"
