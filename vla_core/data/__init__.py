"""wmvla.data"""
