"""The experiment runner: configs, train, plan, sweep, probe, report, bench, models and the CLI."""
