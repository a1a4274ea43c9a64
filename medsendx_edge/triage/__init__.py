"""Triage of mammograms: the science (:mod:`.analysis`), the radiologist's picture (:mod:`.picture`), the
feature rows for the fleet (:mod:`.features`) and the stage (:mod:`.stage`)."""
