"""The tiers a flow can be owned by: machine, VNIC, PNIC."""
