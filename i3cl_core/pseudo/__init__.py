"""pseudo"""
