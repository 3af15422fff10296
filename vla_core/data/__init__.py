"""vla_core.data"""
