"""`pypeft bench`: every method side by side on one task, each run being the
main job (`pypeft finetune`) in a fresh process, gathered into a report with
plots.

runs.py says which runs there are and carries them out; report.py writes
report.md, report.json and the PNGs.
"""
