"""vla_core.world"""
