"""Fleet QC: the miner that names drifting or broken scanners (:mod:`.miner`) and its report (:mod:`.report`)."""
