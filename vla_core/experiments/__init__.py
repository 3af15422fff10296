"""vla_core.experiments"""
