"""PS3.15 Annex E Basic Application Level Confidentiality Profile, with options, on a Dataset.

Pure functions over pydicom Datasets; the file handling (header only, pixel
bytes copied through) lives in :mod:`medsendx_edge.anonymize.dicomio`.

Combined actions are resolved to the choice that is as private as removal and
keeps the object valid whatever the attribute's type in the IOD:
``X/Z -> Z`` (type 2 or 3: empty is valid), ``X/D, Z/D, X/Z/D -> D`` (a dummy
is valid for type 1, 2 and 3), ``X/Z/U* -> U`` (the sequence is kept, the UIDs
inside are replaced).  ``D`` on a sequence keeps its structure and replaces
every text, date and person value inside it with a dummy ("dummy mode"), so
coded identities (PersonIdentificationCodeSequence, InstitutionCodeSequence)
and SR text (ContentSequence) cannot survive.  Attributes outside the table
are decided by the attribute, never by the VR the file claims: private attributes (removed unless on
the explicit safe list), public attributes the dictionary does not know (removed, whatever their VR),
known attributes stored with a VR the dictionary does not allow them (removed), bytes (OB, OW, OF...)
and retired attributes (removed unless vetted), URLs and URIs (removed unless vetted), free text and AE
titles (emptied unless vetted), curve (50xx) and overlay (60xx) groups (removed),
group lengths (removed: they would be wrong), and any UID that is not a
registered DICOM UID (replaced like a ``U`` attribute).
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import hmac
import re
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from pydicom.datadict import dictionary_is_retired, dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.dataelem import DataElement
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID
from pydicom._uid_dict import UID_dictionary

from medsendx_edge.config import AnonymizeConfig

DEIDENTIFICATION_METHOD = "PS3.15 E.1 Basic Profile (MedSendX Edge)"
#: Declared in DeidentificationMethod: StationName is not emptied but replaced (docs/privacy.md).
STATION_DECLARATION = "StationName: fleet station code"
IMPLEMENTATION_CLASS_UID = "2.25.262059441858209870906307547232410392451"
IMPLEMENTATION_VERSION = "MEDSENDX_EDGE_01"

_RESOLVE = {"X/Z": "Z", "X/D": "D", "Z/D": "D", "X/Z/D": "D", "X/Z/U*": "U"}
_TEXT_VRS = {"AE", "AS", "LO", "LT", "PN", "SH", "ST", "UC", "UT", "UR", "DA", "DT", "TM"}
_DATE_VRS = {"DA", "DT", "TM"}
_DUMMY: dict[str, Any] = {
    "AE": "ANONYMIZED", "AS": "000Y", "CS": "ANONYMIZED", "DA": "19000101", "DT": "19000101000000",
    "TM": "000000", "DS": "0", "IS": "0", "LO": "ANONYMIZED", "LT": "ANONYMIZED", "PN": "ANONYMIZED",
    "SH": "ANONYMIZED", "ST": "ANONYMIZED", "UC": "ANONYMIZED", "UT": "ANONYMIZED", "UR": "",
    "FL": 0.0, "FD": 0.0, "SL": 0, "SS": 0, "UL": 0, "US": 0, "SV": 0, "UV": 0, "AT": 0,
    "OB": b"\x00\x00", "OW": b"\x00\x00", "OD": b"\x00" * 8, "OF": b"\x00" * 4, "OL": b"\x00" * 4,
    "OV": b"\x00" * 8, "UN": b"\x00\x00",
}
# Codes of CID 7050 (De-identification Method).
CODES = {
    "basic": ("113100", "Basic Application Confidentiality Profile"),
    "clean_descriptors": ("113105", "Clean Descriptors Option"),
    "full_dates": ("113106", "Retain Longitudinal Temporal Information Full Dates Option"),
    "modified_dates": ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    "retain_patient_characteristics": ("113108", "Retain Patient Characteristics Option"),
    "retain_device_identity": ("113109", "Retain Device Identity Option"),
    "retain_safe_private": ("113111", "Retain Safe Private Option"),
    "retain_institution_identity": ("113112", "Retain Institution Identity Option"),
}
# Words a descriptor may keep under the Clean Descriptors option; anything else is dropped.
SAFE_DESCRIPTOR_WORDS = frozenset(
    """
    L R LEFT RIGHT BILATERAL B LT RT CC MLO ML LM XCC XCCL XCCM FB SIO LMO AT SPOT MAG MAGNIFICATION
    ID IMPLANT DISPLACED TOMO TOMOSYNTHESIS SYNTHETIC SYNTHESIZED 2D 3D DBT FFDM MAMMO MAMMOGRAPHY MAMMOGRAM
    SCREENING DIAGNOSTIC BREAST BREASTS CHEST THORAX ABDOMEN PELVIS HEAD NECK BRAIN SPINE KNEE HAND FOOT
    AXIAL CORONAL SAGITTAL LOCALIZER SCOUT TOPOGRAM VIEW VIEWS PA AP LAT LATERAL OBLIQUE
    CT MR MRI US CR DX MG PT NM XA RF SR SC OT T1 T2 FLAIR DWI ADC STIR
    WITH WITHOUT CONTRAST NO PLAIN ROUTINE STANDARD PROTOCOL SERIES STUDY IMAGE IMAGES
    FOR PRESENTATION PROCESSING AND OF THE ON IN TO A AN
    """.split()
)


@dataclass(frozen=True)
class Profile:
    """Resolved action per tag, after the options."""

    actions: dict[int, str]
    options: tuple[str, ...]
    text_keep: frozenset[int] = frozenset()   # free text outside the table that is vetted as safe

    @classmethod
    def from_config(cls, cfg: AnonymizeConfig) -> "Profile":
        actions: dict[int, str] = {}
        with resources.files("medsendx_edge.data").joinpath("annex_e_basic_profile.tsv").open() as fh:
            for row in csv.DictReader(fh, delimiter="\t"):
                action = row["basic_action"].strip()
                if "x" in row["tag"].lower():
                    # 50xxxxxx curves, 60xx3000/60xx4000 overlays: apply_profile removes those groups whole.
                    continue
                actions[int(row["tag"], 16)] = _RESOLVE.get(action, action)
        options: list[str] = []
        enabled = {name for name in ("retain_patient_characteristics", "retain_device_identity",
                                     "retain_institution_identity", "clean_descriptors") if getattr(cfg, name)}
        longitudinal = cfg.retain_longitudinal
        if longitudinal != "off":
            options.append(longitudinal)
        options.extend(sorted(enabled))
        for tag, cells in option_columns().items():
            device_date = cells.get("retain_device_identity") == "K" and any(
                cells.get(c) for c in ("full_dates", "modified_dates"))
            for option in ("retain_device_identity", "retain_institution_identity",
                           "retain_patient_characteristics", "clean_descriptors"):
                if option in enabled and cells.get(option):
                    actions[tag] = _RESOLVE.get(cells[option], cells[option])
            if longitudinal != "off" and cells.get(longitudinal):
                if _is_birth_or_death(tag):
                    continue  # birth and death dates identify the patient: no longitudinal option keeps them
                if device_date and longitudinal == "modified_dates":
                    # A calibration or installation date belongs to the device, not the patient: shifted by
                    # the patient's offset, one known calibration date would give every offset away.
                    actions[tag] = "K" if "retain_device_identity" in enabled else "X"
                else:
                    actions[tag] = "K" if cells[longitudinal] == "K" else "SHIFT"
        keep: set[int] = set()
        for keyword, rule in text_rules().items():
            named = tag_for_keyword(keyword)
            if named is None:  # pragma: no cover - data file error
                raise ValueError(f"unknown keyword in text_rules.tsv: {keyword}")
            if named in actions:
                continue  # the table (and its options) decide for the attributes it names
            if rule == "K":
                keep.add(named)
            else:
                actions[named] = rule
        # Type 1 attributes the table removes, that an object is invalid without: a dummy instead.
        for keyword in TYPE1_DUMMY:
            named = tag_for_keyword(keyword)
            if named is not None and actions.get(named) == "X":
                actions[named] = "D"
        # X/Z sequences that are Type 3 wherever they occur: removed, since an empty one is invalid.
        for keyword in TYPE3_SEQUENCES:
            named = tag_for_keyword(keyword)
            if named is not None and actions.get(named) == "Z":
                actions[named] = "X"
        if cfg.retain_safe_private:
            options.append("retain_safe_private")
        return cls(actions=actions, options=tuple(options), text_keep=frozenset(keep))


_OPTION_COLUMNS = {"rtnDevIdOpt": "retain_device_identity", "rtnInstIdOpt": "retain_institution_identity",
                   "rtnPatCharsOpt": "retain_patient_characteristics", "rtnLongFullDatesOpt": "full_dates",
                   "rtnLongModifDatesOpt": "modified_dates", "cleanDescOpt": "clean_descriptors",
                   "rtnSafePrivOpt": "retain_safe_private", "rtnUIDsOpt": "retain_uids",
                   "cleanStructContOpt": "clean_structured_content", "cleanGraphOpt": "clean_graphics"}


def option_columns() -> dict[int, dict[str, str]]:
    """Every option column of PS3.15 Table E.1-1 (2024b), per tag: {option: action} for filled cells."""
    out: dict[int, dict[str, str]] = {}
    with resources.files("medsendx_edge.data").joinpath("annex_e_all_options_2024b.tsv").open() as fh:
        lines = [line for line in fh if not line.startswith("#")]
    for row in csv.DictReader(lines, delimiter="\t"):
        tag = row["tag"].strip("()").replace(",", "")
        if "x" in tag.lower() or len(tag) != 8:
            continue
        cells = {name: (row.get(col) or "").strip() for col, name in _OPTION_COLUMNS.items()
                 if (row.get(col) or "").strip()}
        if cells:
            out[int(tag, 16)] = cells
    return out


#: Type 1 in the IODs that carry them, X in Table E.1-1: replaced by a dummy so the object stays valid.
TYPE1_DUMMY = ("PresentationCreationDate", "PresentationCreationTime")
#: X/Z in Table E.1-1, Type 3 in every IOD: removing is valid, emptying is not (zero items).
TYPE3_SEQUENCES = ("ReferencedStudySequence",)
#: The text VRs whose free text the allow-list governs (PN and UC included; AE titles name a site or a
#: person's workstation as freely as any text).
FREE_TEXT_VRS = {"LO", "LT", "SH", "ST", "UT", "PN", "UC", "AE"}
#: Locations (RetrieveURL, StorageURL, PixelDataProviderURL...): removed unless text_rules.tsv vets them.
LOCATION_VRS = {"UR"}


def text_rules() -> dict[str, str]:
    """keyword -> K (kept) or D (dummy) for free text outside the table (``data/text_rules.tsv``)."""
    out: dict[str, str] = {}
    with resources.files("medsendx_edge.data").joinpath("text_rules.tsv").open() as fh:
        for line in fh:
            if line.startswith("#") or not line.strip():
                continue
            keyword, rule = line.rstrip("\n").split("\t")[:2]
            out[keyword] = rule
    return out


def _is_birth_or_death(tag: int) -> bool:
    return any(w in (keyword_for_tag(tag) or "") for w in ("Birth", "Death"))


def hmac_int(secret: bytes, kind: str, value: str, nbytes: int = 16) -> int:
    digest = hmac.new(secret, f"{kind}\x00{value}".encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:nbytes], "big")


@dataclass
class Context:
    """Everything one anonymization needs: site secret, profile, options."""

    secret: bytes
    cfg: AnonymizeConfig
    station_name: str
    profile: Profile
    safe_private: frozenset[tuple[int, int, str]] = field(default=frozenset())

    @classmethod
    def create(cls, secret: bytes, cfg: AnonymizeConfig, station_name: str) -> "Context":
        safe = set()
        if cfg.retain_safe_private:
            for entry in cfg.safe_private_tags:
                g, e, creator = entry.split(",", 2)
                safe.add((int(g, 16), int(e, 16), creator.strip()))
        return cls(secret, cfg, station_name, Profile.from_config(cfg), frozenset(safe))

    def uid(self, value: str) -> str:
        """The pseudonym of a UID: ``2.25.<128-bit HMAC>``, the same on every truck sharing the secret."""
        value = str(value).strip().rstrip("\x00")
        if not value:
            return value
        return f"2.25.{hmac_int(self.secret, 'uid', value)}"

    def patient_pseudonym(self, patient_id: str) -> str:
        return "MSX" + format(hmac_int(self.secret, "patient", patient_id.strip(), 10), "020X")

    def date_shift_days(self, patient_id: str) -> int:
        """Per-patient shift into the past, 1..3650 days, deterministic."""
        return -(1 + hmac_int(self.secret, "dateshift", patient_id.strip(), 8) % 3650)


@dataclass
class Linkage:
    """What re-identification needs; stays on the truck (see :mod:`medsendx_edge.anonymize.linkage`)."""

    pseudonym: str
    original_patient_id: str
    original_patient_name: str
    original_accession: str
    original_study_uid: str
    original_sop_uid: str
    study_uid: str
    sop_uid: str
    original_time: str = ""   # when the image was taken (HH:MM, the modality's clock): the console's alert


def _clock(ds: Dataset) -> str:
    """HH:MM of the acquisition (or content, or series) time, for the truck's own alert; "" if none."""
    for kw in ("AcquisitionDateTime", "AcquisitionTime", "ContentTime", "SeriesTime"):
        value = str(ds.get(kw, "") or "").strip()
        if kw == "AcquisitionDateTime":
            value = value[8:]
        if len(value) >= 4 and value[:4].isdigit() and int(value[:2]) < 24 and int(value[2:4]) < 60:
            return f"{value[:2]}:{value[2:4]}"
    return ""


def _is_registered_uid(value: str) -> bool:
    return value in UID_dictionary


def _map_uids(value: Any, ctx: Context, only_unregistered: bool) -> Any:
    def one(v: Any) -> str:
        s = str(v).strip().rstrip("\x00")
        if not s or (only_unregistered and _is_registered_uid(s)):
            return s
        return ctx.uid(s)

    if isinstance(value, (list, MultiValue)):
        return [one(v) for v in value]
    return one(value) if value is not None else value


_DATE_RE = re.compile(r"^(\d{4})(\d{2})(\d{2})(.*)$")


def _shift_one(value: str, vr: str, days: int) -> str | None:
    value = value.strip()
    if not value or vr == "TM":
        return value
    m = _DATE_RE.match(value)
    if not m:
        return None
    try:
        d = dt.date(int(m.group(1)), int(m.group(2)), int(m.group(3))) + dt.timedelta(days=days)
    except ValueError:
        return None
    rest = m.group(4)
    if vr == "DA" and rest:
        # A range "A-B" in a query-style DA: shift both ends.
        if rest.startswith("-"):
            other = _shift_one(rest[1:], vr, days)
            return None if other is None else f"{d:%Y%m%d}-{other}"
        return None
    return f"{d:%Y%m%d}{rest}"


def _shift(elem: DataElement, days: int) -> None:
    values = elem.value if isinstance(elem.value, (list, MultiValue)) else [elem.value]
    out = []
    for v in values:
        shifted = _shift_one(str(v), elem.VR, days) if v is not None else ""
        if shifted is None:  # unparseable: could hide anything
            elem.value = _DUMMY[elem.VR]
            return
        out.append(shifted)
    elem.value = out if len(out) > 1 else (out[0] if out else "")


def _clean_text(value: Any) -> str:
    text = " ".join(str(v) for v in value) if isinstance(value, (list, MultiValue)) else str(value or "")
    words = re.split(r"[^A-Za-z0-9]+", text)
    kept = [w.upper() for w in words if w and w.upper() in SAFE_DESCRIPTOR_WORDS]
    return " ".join(kept)


def _dummy(elem: DataElement, ctx: Context) -> None:
    if elem.VR == "UI":
        elem.value = _map_uids(elem.value, ctx, only_unregistered=False)
    elif elem.VR == "SQ":
        elem.value = Sequence([])
    else:
        elem.value = _DUMMY.get(elem.VR, "")


def _empty(elem: DataElement) -> None:
    elem.value = Sequence([]) if elem.VR == "SQ" else None


def _private_kept(ds: Dataset, tag: BaseTag, ctx: Context) -> bool:
    if not ctx.safe_private:
        return False
    if tag.element < 0x0100:  # a private creator: kept when one of its block's elements is kept
        if tag.element < 0x10:
            return False
        creator = str(ds[tag].value).strip()
        return any(g == tag.group and c == creator for g, _e, c in ctx.safe_private)
    block = tag.element >> 8
    creator_tag = Tag(tag.group, block)
    if creator_tag not in ds:
        return False
    creator = str(ds[creator_tag].value).strip()
    return (tag.group, tag.element & 0xFF, creator) in ctx.safe_private


def _dictionary_vr(tag: int) -> str:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return "UN"


def _is_unknown_vr(ds: Dataset, tag: BaseTag) -> bool:
    """Stored as UN (explicit VR), or an implicit-VR element whose tag the dictionary lacks."""
    raw = ds.get_item(tag)
    vr = getattr(raw, "VR", None)
    return vr == "UN" or (vr is None and _dictionary_vr(int(tag)) == "UN")


def _decode_un(ds: Dataset, tag: BaseTag) -> bool:
    """Decode a UN element with its dictionary VR (a sequence becomes a sequence the profile walks
    into, a UID a UID it replaces, a text a text it can blank); remove it when the tag is unknown or
    the bytes do not decode.  True when the element is still there, now with its real VR.

    Implicit VR files, private-to-public conversions and retired tags meet UN every day: copied
    as bytes, a sequence in UN would carry whatever names it holds past the profile."""
    if _dictionary_vr(int(tag)) == "UN":
        del ds[tag]
        return False
    try:
        elem = ds[tag]  # pydicom replaces UN with the dictionary VR (config.replace_un_with_known_vr)
        if elem.VR == "UN" or isinstance(elem.value, (bytes, bytearray)) and elem.VR not in _BINARY_VRS:
            raise ValueError("not decoded")
    except Exception:  # noqa: BLE001 - undecodable: the safe answer is removal
        del ds[tag]
        return False
    return True


_BINARY_VRS = {"OB", "OW", "OD", "OF", "OL", "OV", "UN", "OB or OW", "US or OW", "US or SS or OW"}
#: Pixel Data and its float forms: the frames are cut to their declared size by dicomio, not here.
_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
#: Stored VRs that hold the same words as the binary or numeric VR the dictionary gives (old writers put
#: palettes and LUTs in US or OB, an implicit file leaves OB or OW open).
_WORDS = {"OB", "OW", "US", "SS"}


def _stored_as_its_vr(ds: Dataset, tag: BaseTag, vr: str) -> bool:
    """The VR the file stores the element with is one the data dictionary allows for the attribute."""
    stored = getattr(ds.get_item(tag), "VR", None)
    if stored is None or vr == "UN" or stored == vr:   # implicit, unknown, or still ambiguous in memory
        return True
    allowed = set(vr.split(" or "))
    return stored in allowed or (stored in _WORDS and bool(allowed & _WORDS))


_SETTLED = "settled"  # _action_for: the element was removed, or is kept exactly as read


def apply_profile(ds: Dataset, ctx: Context, *, dummy_mode: bool = False, date_shift: int = 0) -> None:
    """Apply the resolved profile to ``ds`` in place, at every depth of nested sequences."""
    for key in list(ds.keys()):
        tag = Tag(key)
        action = _action_for(ds, tag, ctx, dummy_mode)
        if action != _SETTLED:
            _apply(ds, tag, action, ctx, dummy_mode, date_shift)


def _action_for(ds: Dataset, tag: BaseTag, ctx: Context, dummy_mode: bool) -> str | None:
    """What to do with one element: removes what goes without reading it (group lengths, overlays and
    curves, private tags not retained, X), leaves untouched what is kept as read, and returns the
    action for the rest (None: walk it, mapping UIDs and recursing into sequences)."""
    if tag.element == 0 or (tag.group & 0xFF00) in (0x5000, 0x6000):
        del ds[tag]
        return _SETTLED
    if tag.is_private:
        if not _private_kept(ds, tag, ctx):
            del ds[tag]
        return _SETTLED
    action = ctx.profile.actions.get(int(tag))
    if action == "X":
        del ds[tag]
        return _SETTLED
    if action is None and _dictionary_vr(int(tag)) == "UN":
        # A public tag neither the table nor the data dictionary knows: nobody can say what it holds,
        # whatever VR it claims (OB, CS, AE...): removed, never copied.
        del ds[tag]
        return _SETTLED
    if _is_unknown_vr(ds, tag) and not _decode_un(ds, tag):
        return _SETTLED  # an element we cannot read as what it is: removed, never copied as bytes
    vr = _dictionary_vr(int(tag))   # the attribute decides, not the VR the file claims for it
    if not _stored_as_its_vr(ds, tag, vr):
        del ds[tag]   # a known attribute written with another VR (a name in an OB ExtendedCodeValue)
        return _SETTLED
    if action is None or action == "K":
        # Most elements are kept as read: left raw, neither decoded nor re-encoded.
        keep_text = int(tag) in ctx.profile.text_keep
        if action is None and not keep_text and (vr in _BINARY_VRS or dictionary_is_retired(int(tag))):
            # Bytes outside the table (MakerNote, GPS blocks, signatures, PrivateInformation...) and
            # retired attributes (SourceImageIDs, VariablePixelData...) nobody vetted: removed.  The
            # pixel data elements are dicomio's (trimmed to the frames); vetted arrays (LUTs, palettes,
            # waveforms, meshes) are listed in data/text_rules.tsv.
            if int(tag) not in _PIXEL_TAGS:
                del ds[tag]
                return _SETTLED
        if action is None and vr in LOCATION_VRS and not keep_text:
            del ds[tag]  # a URL or URI outside the table (RetrieveURL...): where the object came from
            return _SETTLED
        if action is None and vr in FREE_TEXT_VRS and not keep_text:
            # Free text the table does not name and nobody vetted: emptied (a dummy inside a sequence
            # the table dummies, such as SR content, where Type 1 text must stay present).
            return "D" if dummy_mode else "Z"
        if vr not in ("SQ", "UI") and not (dummy_mode and vr in _TEXT_VRS and not keep_text):
            return _SETTLED
    return action


def _apply(ds: Dataset, tag: BaseTag, action: str | None, ctx: Context, dummy_mode: bool, date_shift: int) -> None:
    """Carry out ``action`` on one element (PS3.15 Table E.1-1's letters, plus SHIFT for dates)."""
    elem = ds[tag]
    vr = elem.VR
    items = (elem.value or []) if vr == "SQ" else []
    if action is None:
        if vr == "SQ":
            for item in items:
                apply_profile(item, ctx, dummy_mode=dummy_mode, date_shift=date_shift)
        elif vr == "UI":
            elem.value = _map_uids(elem.value, ctx, only_unregistered=True)
        elif dummy_mode and vr in _TEXT_VRS and not elem.is_empty and int(tag) not in ctx.profile.text_keep:
            elem.value = _DUMMY[vr]
    elif action == "Z":
        _empty(elem)
    elif action == "K":
        for item in items:
            apply_profile(item, ctx, dummy_mode=dummy_mode, date_shift=date_shift)
    elif action in ("D", "U"):
        if vr == "SQ":
            for item in items:
                apply_profile(item, ctx, dummy_mode=dummy_mode or action == "D", date_shift=date_shift)
        elif action == "U" and vr == "UI":
            elem.value = _map_uids(elem.value, ctx, only_unregistered=False)
        elif not elem.is_empty or action == "D":
            _dummy(elem, ctx)
    elif action == "SHIFT":
        if vr in _DATE_VRS and not elem.is_empty:
            _shift(elem, date_shift)
    elif action == "C":
        cleaned = None if vr == "SQ" or elem.is_empty else _clean_text(elem.value)
        if cleaned:
            elem.value = cleaned
        elif vr == "SQ" or not elem.is_empty:
            del ds[tag]
    else:  # pragma: no cover - data file error
        raise ValueError(f"unknown action {action!r} for tag {tag}")


_AGE_RE = re.compile(r"^(\d{3})([DWMY])$")


def _cap_age(ds: Dataset) -> None:
    """Ages over 89 become 090Y (HIPAA Safe Harbor aggregates them as 90 or older), when kept."""
    age = str(ds.get("PatientAge", "") or "").strip().upper()
    m = _AGE_RE.match(age)
    if m and m.group(2) == "Y" and int(m.group(1)) > 89:
        ds.PatientAge = "090Y"


def _mark(ds: Dataset, ctx: Context) -> None:
    ds.PatientIdentityRemoved = "YES"
    option_names = [o for o in ctx.profile.options]
    ds.DeidentificationMethod = [DEIDENTIFICATION_METHOD] + [CODES[o][1][:64] for o in option_names] + [
        STATION_DECLARATION]
    seq = []
    for key in ["basic", *option_names]:
        code, meaning = CODES[key]
        item = Dataset()
        item.CodeValue = code
        item.CodingSchemeDesignator = "DCM"
        item.CodeMeaning = meaning
        seq.append(item)
    ds.DeidentificationMethodCodeSequence = seq
    longitudinal = ctx.cfg.retain_longitudinal
    ds.LongitudinalTemporalInformationModified = {
        "off": "REMOVED", "modified_dates": "MODIFIED", "full_dates": "UNMODIFIED"}[longitudinal]


def anonymize_dataset(ds: Dataset, ctx: Context, trailing: Dataset | None = None) -> Linkage:
    """Anonymize ``ds`` (and the elements stored after its pixel data) in place.

    Returns the linkage record (original identifiers) for the truck-only table.
    """
    original_pid = str(ds.get("PatientID", "") or "")
    # Without a PatientID every file would share one pseudonym and one date shift (different women
    # merged into one pseudonymous patient): each study then gets its own, derived from the study.
    key = original_pid.strip() or "study:" + str(ds.get("StudyInstanceUID", "") or ds.get("SOPInstanceUID", ""))
    linkage = Linkage(
        pseudonym=ctx.patient_pseudonym(key),
        original_patient_id=original_pid,
        original_patient_name=str(ds.get("PatientName", "") or ""),
        original_accession=str(ds.get("AccessionNumber", "") or ""),
        original_study_uid=str(ds.get("StudyInstanceUID", "") or ""),
        original_sop_uid=str(ds.get("SOPInstanceUID", "") or ""),
        study_uid="",
        sop_uid="",
        original_time=_clock(ds),
    )
    shift = ctx.date_shift_days(key)
    apply_profile(ds, ctx, date_shift=shift)
    if trailing is not None:
        apply_profile(trailing, ctx, date_shift=shift)
    _cap_age(ds)
    if "EncapsulatedDocumentLength" in ds:
        doc = ds.get("EncapsulatedDocument")
        if doc is None:
            del ds.EncapsulatedDocumentLength
        else:
            ds.EncapsulatedDocumentLength = len(doc)  # the document was replaced: its length follows
    ds.PatientID = linkage.pseudonym
    ds.PatientName = linkage.pseudonym if ctx.cfg.patient_name == "pseudonym" else ""
    ds.StationName = ctx.station_name  # the fleet's station code (docs/privacy.md): within SH's 16 characters
    if "Manufacturer" not in ds and "Enhanced" not in UID(str(ds.get("SOPClassUID", "") or "")).name:
        # Type 2 of the General Equipment module that StationName brings in (in the Enhanced General
        # Equipment module it is Type 1: an empty value would be no better than none).
        ds.Manufacturer = ""
    _mark(ds, ctx)
    linkage.study_uid = str(ds.get("StudyInstanceUID", "") or "")
    linkage.sop_uid = str(ds.get("SOPInstanceUID", "") or "")
    fm = getattr(ds, "file_meta", None)
    if fm is not None:
        new_meta = Dataset()
        for kw in ("MediaStorageSOPClassUID", "TransferSyntaxUID"):
            if kw in fm:
                setattr(new_meta, kw, getattr(fm, kw))
        new_meta.MediaStorageSOPInstanceUID = linkage.sop_uid or ctx.uid(str(fm.get("MediaStorageSOPInstanceUID", "")))
        new_meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
        new_meta.ImplementationVersionName = IMPLEMENTATION_VERSION
        ds.file_meta = new_meta  # type: ignore[assignment]
    return linkage


BURNED_IN_SOP_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture family (incl. multi-frame SC)
)


def burned_in_reason(ds: Dataset) -> str | None:
    """Why this object may carry burned-in text, or None."""
    flag = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
    if flag == "YES":
        return "BurnedInAnnotation is YES: pixels may show identifying text (burned_in: allow to pass)"
    sop = str(ds.get("SOPClassUID", "") or "")
    if flag != "NO" and sop.startswith(BURNED_IN_SOP_PREFIXES):
        return "secondary capture without BurnedInAnnotation NO: pixels may show identifying text"
    return None
