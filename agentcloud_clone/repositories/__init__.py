"""MongoDB queries. Every query on team data filters by `teamId`."""
