"""fwdgrad's exceptions, and warnings that point at the user's code (the first frame outside fwdgrad).

Every argument error fwdgrad raises is an ``fwdgrad.Error``, which is a
``RuntimeError`` (what torch.func raises for the same mistakes, so code
written as ``except RuntimeError`` keeps working) and also the Python error
that fits: ``ArgumentTypeError`` is a ``TypeError``, ``ArgumentValueError``
a ``ValueError``.
"""

import os
import sys
import warnings

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class Error(RuntimeError):
    """Base class of fwdgrad's errors (a ``RuntimeError``, as torch.func's are).

    >>> import torch, fwdgrad
    >>> try:
    ...     fwdgrad.jvp(torch.sin, (torch.ones(2),), (torch.ones(3),))
    ... except RuntimeError as e:
    ...     print(type(e).__name__, isinstance(e, fwdgrad.Error))
    ArgumentValueError True
    """


class ArgumentTypeError(Error, TypeError):
    """An argument, or a value the user's function returned, has the wrong type.

    >>> import torch, fwdgrad
    >>> try:
    ...     fwdgrad.jvp(torch.sin, (torch.ones(2),), (1.0,))
    ... except TypeError as e:
    ...     print(e)
    jvp: the tangent of primals[0] is a float; tangents must only contain Tensors (or None for a zero tangent)
    """


class ArgumentValueError(Error, ValueError):
    """An argument, or a value the user's function returned, has the wrong value or shape.

    >>> import torch, fwdgrad
    >>> try:
    ...     fwdgrad.jvp(torch.sin, (torch.ones(2),), (torch.ones(3),))
    ... except ValueError as e:
    ...     print(e)
    jvp: the tangent of primals[0] has shape (3,) but primals[0] has shape (2,)
    """


def warn(message):
    """``warnings.warn`` pointing at the first caller outside fwdgrad."""
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR + os.sep):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, UserWarning, stacklevel=level + 1)
