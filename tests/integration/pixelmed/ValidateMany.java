// Runs PixelMed's DicomSRValidator on several files in one JVM (the CLI takes one file and
// spends most of its time compiling the validator's stylesheets). Output per file:
// "==== <path>" then exactly what `DicomSRValidator <path>` prints.
// java -cp pixelmed.jar:commons-codec.jar ValidateMany.java a.dcm b.dcm
import com.pixelmed.validate.DicomSRValidator;

public class ValidateMany {
    public static void main(String[] args) throws Exception {
        DicomSRValidator validator = new DicomSRValidator();
        for (String path : args) {
            System.out.println("==== " + path);
            System.out.print(validator.validate(path));
            System.out.flush();
        }
    }
}
