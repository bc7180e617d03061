"""The codes the DICOM objects carry, in one place (README, "DICOM export").

SNOMED CT has no concept for a cerebral microbleed as a segmented structure. The nearest,
723857007 "Silent micro-hemorrhage of brain (disorder)", is a disorder, not a morphology:
it asserts that the bleed is clinically silent, which an image cannot tell, and it belongs to
no DICOM context group (CID 7150/7151 list what a segment may be). So a lesion is coded as
Slicer's terminology codes it (outputs.TERMINOLOGY_ENTRY): SCT 50960005 "Hemorrhage", a
"Morphologically Abnormal Structure" (SCT 49755003), anatomic region SCT 12738006 "Brain";
"microbleed" is in the segment label and the SR's tracking identifier. What DICOM has no
code for (the probability, the certainty and size classes, the MARS category and structure, the
counts by class and region) uses our own
coding scheme 99CMBDETECT, declared in each object's Coding Scheme Identification Sequence.
"""

from __future__ import annotations

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from ..anatomy.atlas import STRUCTURES

LESION_CATEGORY = codes.SCT.MorphologicallyAbnormalStructure  # SCT 49755003
LESION_TYPE = codes.SCT.Hemorrhage  # SCT 50960005, as in Slicer's terminology and the .seg.nrrd
REGION = codes.SCT.Brain  # SCT 12738006

SCHEME = "99CMBDETECT"  # private coding schemes start with "99" (DICOM PS3.16 8.2)
SCHEME_NAME = "CMBDetect codes"

# Code values are SH: at most 16 characters.
EQUIVALENT_DIAMETER = Code("CMB-EQDIAM", SCHEME, "Diameter of the sphere of equal volume")
P_MICROBLEED = Code("CMB-PMICROBLEED", SCHEME, "Probability of microbleed")
SIZE_CLASS = Code("CMB-SIZECLASS", SCHEME, "Microbleed size class")
SIZE_VALUES = {
    "small": Code("CMB-SMALL", SCHEME, "Small microbleed (2-5 mm)"),
    "large": Code("CMB-LARGE", SCHEME, "Large microbleed (5-10 mm)"),
}
CERTAINTY_VALUES = {
    "definite": Code("CMB-DEFINITE", SCHEME, "Definite microbleed"),
    "possible": Code("CMB-POSSIBLE", SCHEME, "Possible microbleed"),
}
# Per case: the total is SNOMED's "Number of lesions"; the counts by class are ours.
N_LESIONS = codes.SCT.NumberOfLesions  # SCT 246206008
CLASS_COUNTS = {
    "n_small": Code("CMB-NSMALL", SCHEME, "Number of small microbleeds"),
    "n_large": Code("CMB-NLARGE", SCHEME, "Number of large microbleeds"),
    "n_definite": Code("CMB-NDEFINITE", SCHEME, "Number of definite microbleeds"),
    "n_possible": Code("CMB-NPOSSIBLE", SCHEME, "Number of possible microbleeds"),
}
# MARS location (anatomy/): the category and structure as our codes, the side as the finding
# site's laterality (SCT Left / Right) or, at the midline, its topographical modifier.
MARS_REGION = Code("CMB-MARSREGION", SCHEME, "MARS microbleed location category")
MARS_REGION_VALUES = {
    "lobar": Code("CMB-LOBAR", SCHEME, "Lobar"),
    "deep": Code("CMB-DEEP", SCHEME, "Deep"),
    "infratentorial": Code("CMB-INFRATENT", SCHEME, "Infratentorial"),
    "unknown": Code("CMB-REGIONUNK", SCHEME, "Location unknown: registration to the template failed QC"),
}
MARS_STRUCTURE = Code("CMB-MARSSTRUCT", SCHEME, "MARS structure")
MARS_STRUCTURE_VALUES = {
    **{name: Code(f"CMB-ST{n:02d}", SCHEME, name.replace("_", " ").capitalize()) for n, (name, _) in enumerate(STRUCTURES, start=1)},
    "unknown": Code("CMB-ST00", SCHEME, "Structure unknown"),
}
LATERALITY = {"left": codes.SCT.Left, "right": codes.SCT.Right}
MIDLINE = codes.SCT.Midline  # SCT 261129000
REGION_COUNTS = {
    "n_lobar": Code("CMB-NLOBAR", SCHEME, "Number of lobar microbleeds"),
    "n_deep": Code("CMB-NDEEP", SCHEME, "Number of deep microbleeds"),
    "n_infratentorial": Code("CMB-NINFRATENT", SCHEME, "Number of infratentorial microbleeds"),
    "n_region_unknown": Code("CMB-NREGIONUNK", SCHEME, "Number of microbleeds of unknown location"),
}
LESIONS_UNIT = Code("{lesions}", "UCUM", "lesions")
NO_UNITS = Code("1", "UCUM", "no units")


def declare_scheme(dataset) -> None:
    """Add our coding scheme to the dataset's Coding Scheme Identification Sequence."""
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodingSchemeDesignator = SCHEME
    item.CodingSchemeName = SCHEME_NAME
    item.CodingSchemeResponsibleOrganization = "CMBDetect"
    dataset.CodingSchemeIdentificationSequence = [item]
