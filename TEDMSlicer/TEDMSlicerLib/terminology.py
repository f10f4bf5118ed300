"""Standard terminology (DICOM / SNOMED CT) for the segments TEDMSlicer writes.

A segment that carries a ``TerminologyEntry`` tag is what Slicer's Segment Editor, DICOM SEG
export and quantification modules recognise as "lung" or "neoplasm" rather than a free-text
name; SlicerMONAIAuto3DSeg and SlicerTotalSegmentator tag their segments the same way.

Every code and recommended colour below is copied from Slicer's own terminology files
(Slicer/Slicer, ``Modules/Loadable/Terminologies/Resources/``:
``SegmentationCategoryTypeModifier-SlicerGeneralAnatomy.json``,
``SegmentationCategoryTypeModifier-DICOM-Master.json`` and
``AnatomicRegionAndModifier-DICOM-Master.json``), never typed from memory;
``tests/test_slicer_logic.py`` pins them. The tag's format (seven ``~``-separated parts, each
code a ``scheme^value^meaning`` triplet) is Slicer's, documented in its developer guide
(``Docs/developer_guide/modules/segmentations.md``, "TerminologyEntry tag").

A class name that is not in :data:`TERMS` is written without a tag: a wrong code is worse than
none.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

GENERAL_ANATOMY = "Segmentation category and type - 3D Slicer General Anatomy list"
DICOM_MASTER = "Segmentation category and type - DICOM master list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"
TERMINOLOGY_TAG = "TerminologyEntry"  # vtkSegment::GetTerminologyEntryTagName()

Code = Tuple[str, str, str]  # (coding scheme designator, code value, code meaning)
NO_CODE: Code = ("", "", "")

ANATOMICAL_STRUCTURE: Code = ("SCT", "123037004", "Anatomical Structure")
MORPHOLOGICALLY_ALTERED: Code = ("SCT", "49755003", "Morphologically Altered Structure")
RIGHT: Code = ("SCT", "24028007", "Right")
LEFT: Code = ("SCT", "7771000", "Left")
BRAIN_REGION: Code = ("SCT", "12738006", "Brain")


@dataclass(frozen=True)
class Term:
    """One segment's standard meaning and, where the terminology recommends one, its colour."""

    context: str
    category: Code
    type: Code
    modifier: Code = NO_CODE
    region: Code = NO_CODE
    region_modifier: Code = NO_CODE
    colour: Optional[Tuple[int, int, int]] = None  # recommendedDisplayRGBValue, 0-255

    def entry(self) -> str:
        """The ``TerminologyEntry`` tag value, in Slicer's serialisation."""

        def triplet(code: Code) -> str:
            return "^".join(code)

        return "~".join(
            [
                self.context,
                triplet(self.category),
                triplet(self.type),
                triplet(self.modifier),
                ANATOMIC_CONTEXT if self.region != NO_CODE else "",
                triplet(self.region),
                triplet(self.region_modifier),
            ]
        )


_LUNG: Code = ("SCT", "39607008", "Lung")
_LUNG_COLOUR = (197, 165, 145)
_HEART = Term(GENERAL_ANATOMY, ANATOMICAL_STRUCTURE, ("SCT", "80891009", "Heart"), colour=(206, 110, 84))
_GREY_MATTER = Term(GENERAL_ANATOMY, ANATOMICAL_STRUCTURE, ("SCT", "389081007", "Gray Matter"), colour=(200, 200, 235))
_WHITE_MATTER = Term(
    GENERAL_ANATOMY, ANATOMICAL_STRUCTURE, ("SCT", "389080008", "White Matter"), colour=(250, 250, 210)
)
# A brain tumour as BraTS' whole tumour is drawn: a neoplasm (DICOM master list; no recommended
# colour there, so the model's colour is kept) in the brain.
_BRAIN_NEOPLASM = Term(
    DICOM_MASTER, MORPHOLOGICALLY_ALTERED, ("SCT", "108369006", "Neoplasm"), region=BRAIN_REGION, colour=None
)

# Class names (lower case, spaces for '_' and '-') -> term. The names the project's bundles and
# the README's examples use.
TERMS: Dict[str, Term] = {
    "lung": Term(GENERAL_ANATOMY, ANATOMICAL_STRUCTURE, _LUNG, colour=_LUNG_COLOUR),
    "lungs": Term(GENERAL_ANATOMY, ANATOMICAL_STRUCTURE, _LUNG, colour=_LUNG_COLOUR),
    "right lung": Term(GENERAL_ANATOMY, ANATOMICAL_STRUCTURE, _LUNG, RIGHT, colour=_LUNG_COLOUR),
    "left lung": Term(GENERAL_ANATOMY, ANATOMICAL_STRUCTURE, _LUNG, LEFT, colour=_LUNG_COLOUR),
    "heart": _HEART,
    "mediastinum": Term(
        GENERAL_ANATOMY, ANATOMICAL_STRUCTURE, ("SCT", "72410000", "Mediastinum"), colour=(255, 244, 209)
    ),
    "grey matter": _GREY_MATTER,
    "gray matter": _GREY_MATTER,
    "gm": _GREY_MATTER,
    "white matter": _WHITE_MATTER,
    "wm": _WHITE_MATTER,
    "tumour": _BRAIN_NEOPLASM,
    "tumor": _BRAIN_NEOPLASM,
    "brain tumour": _BRAIN_NEOPLASM,
    "brain tumor": _BRAIN_NEOPLASM,
    "whole tumour": _BRAIN_NEOPLASM,
    "whole tumor": _BRAIN_NEOPLASM,
    "neoplasm": _BRAIN_NEOPLASM,
    "edema": Term(GENERAL_ANATOMY, MORPHOLOGICALLY_ALTERED, ("SCT", "79654002", "Edema"), colour=(140, 224, 228)),
    "oedema": Term(GENERAL_ANATOMY, MORPHOLOGICALLY_ALTERED, ("SCT", "79654002", "Edema"), colour=(140, 224, 228)),
    "necrosis": Term(GENERAL_ANATOMY, MORPHOLOGICALLY_ALTERED, ("SCT", "6574001", "Necrosis"), colour=(216, 191, 216)),
    "brain": Term(GENERAL_ANATOMY, ANATOMICAL_STRUCTURE, ("SCT", "12738006", "Brain"), colour=(250, 250, 225)),
    "liver": Term(GENERAL_ANATOMY, ANATOMICAL_STRUCTURE, ("SCT", "10200004", "Liver"), colour=(221, 130, 101)),
}


def term_for(class_name: str) -> Optional[Term]:
    """The standard term of a class name, or None when there is no sure match."""
    key = re.sub(r"[\s_\-/]+", " ", str(class_name).strip().lower())
    return TERMS.get(key)


def tag_segment(segment, class_name: str, use_recommended_colour: bool = True) -> Optional[Term]:
    """Set the segment's ``TerminologyEntry`` (and the recommended colour, if the terminology has
    one) for ``class_name``; a segment of an unknown class is left untagged. Returns the term."""
    term = term_for(class_name)
    if term is None:
        return None
    segment.SetTag(TERMINOLOGY_TAG, term.entry())
    if use_recommended_colour and term.colour is not None:
        segment.SetColor(*(c / 255.0 for c in term.colour))
    return term
