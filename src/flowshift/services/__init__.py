"""The stateful services of a machine's chain: firewall (conntrack), nat, lb, count."""
