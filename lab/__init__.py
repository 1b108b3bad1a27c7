"""The lab: research tools around the core (which never imports them), run as modules from the root.

    python -m lab.evaluate --out_dir=out      # likelihoods with standard errors; --grid: samples
    python -m lab.sudoku build                # Sudoku: the dataset, the preset, the solve rate
    python -m lab.sweep                       # the paper's Table 1 at small scale
    python -m lab.bench --throughput          # the speed table, timed as the official code does
    python -m lab.convert --source=sahoo-diffusion/Eso-LM-B-alpha-0_25 --out_dir=out_owt
"""
