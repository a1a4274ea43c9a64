"""De-identification on the truck: the PS3.15 Annex E profile (:mod:`.profile`), header-only file
handling (:mod:`.dicomio`), the re-identification table (:mod:`.linkage`) and the stage (:mod:`.stage`)."""
