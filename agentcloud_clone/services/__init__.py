"""The rules of the product. No `request` in here: blueprints, jobs and the CLI all call these."""
