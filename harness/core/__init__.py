"""The small core every layer uses: configuration, errors, registries, the defense interface, its validation and
reference protocols, models, data sets, the shared PGD, provenance.
"""
