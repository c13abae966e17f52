"""Tiers: the classifier networks a client trains (the registry of tiers), and which one a device
can train in a round (device profiles, the tier catalogue, the policy).
"""
