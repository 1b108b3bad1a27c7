"""
The lab: the research tools around the core, each run as a module from the repository's root.

    python -m lab.evaluate --out_dir=out      # likelihoods with standard errors; --grid: samples
    python -m lab.sudoku build                # Sudoku: the dataset, the preset, the solve rate
    python -m lab.sweep                       # the paper's Table 1 at small scale
    python -m lab.bench --throughput          # the speed table, timed as the official code does
    python -m lab.convert --source=sahoo-diffusion/Eso-LM-B-alpha-0_25 --out_dir=out_owt

The core (esolm.py, train.py, sample.py, prepare_data.py and their helpers) never imports from here.
"""
