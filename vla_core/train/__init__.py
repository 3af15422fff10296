"""vla_core.train"""
