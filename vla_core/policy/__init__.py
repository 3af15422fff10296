"""vla_core.policy"""
