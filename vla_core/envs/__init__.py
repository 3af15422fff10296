"""vla_core.envs"""
