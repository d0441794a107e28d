"""clean: records -> filters -> dedup -> kept + removed + report."""
