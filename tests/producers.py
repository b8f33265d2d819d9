"""Array producers that are not NumPy arrays, as a framework's tensors are."""


class DLPackOnly:
    """A DLPack producer that is not a numpy array and has no __array__."""

    def __init__(self, array):
        self._array = array

    def __dlpack__(self, **kwargs):
        return self._array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._array.__dlpack_device__()
