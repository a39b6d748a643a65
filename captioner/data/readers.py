"""placeholder"""
class DatasetError(ValueError):
    pass
