"""Attacks by a server that a site must survive (issue 11): each test runs the attack."""
