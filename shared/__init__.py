"""Machinery the five token-reduction methods have in common.

DeiT's data, distributed, logging, checkpoint and engine code exists once here; ToMe's token merging too, because
ToCom and DiffRate both stand on it. See DEVELOPING.md for the module map.
"""
