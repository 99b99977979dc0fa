"""The experiment runner and the command line: train, plan, sweep, probe, report, bench, models, cli."""
