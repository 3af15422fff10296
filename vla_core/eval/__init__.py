"""wmvla.eval"""
