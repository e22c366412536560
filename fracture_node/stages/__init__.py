"""The stages of the flow, in the order data goes through them.

receive   ``dicom/scp.py`` (C-STORE) and ``web/stow.py`` (STOW-RS) take objects in through
          ``dicom/intake.py``: checked, fsynced to the spool, recorded in SQL (the queue), and
          only then acknowledged. It lives in ``dicom/`` because it answers in DICOM statuses.
score     :mod:`~fracture_node.stages.score`: the worker claims queued instances, decodes them,
          runs the model in batches and stores each result (stale claims:
          :mod:`~fracture_node.stages.claims`).
report    :mod:`~fracture_node.stages.report`: a stable study becomes a versioned SR (and its
          overlays), queued for every destination.
deliver   :mod:`~fracture_node.stages.deliver`: C-STORE or STOW-RS to each destination, retried
          with back-off and dead-lettered.
upkeep    :mod:`~fracture_node.stages.housekeeping`: retention, database upkeep, gauges.

:mod:`fracture_node.daemon` starts them; each stage talks to the next only through SQL.
"""
