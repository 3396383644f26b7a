"""The standard face-recognition benchmarks: insightface's ``.bin`` verification sets
(LFW, CFP-FP, AgeDB-30, CALFW, CPLFW) and IJB-B / IJB-C 1:1 verification."""
