"""wmvla.policy"""
