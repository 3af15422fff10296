"""vla_core.eval"""
