"""MedSendX Edge: an edge gateway that anonymizes, triages and uploads DICOM from mobile units."""

__version__ = "0.1.0"
