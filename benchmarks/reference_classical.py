"""Classical (non-learning) registration baselines for the 3D brain MRI benchmark.

Two adapters with the same contract::

    field, seconds = syn_register(fixed, moving)
    field, seconds = demons_register(fixed, moving)

* ``fixed`` and ``moving`` are 3D SimpleITK images (any pixel type; they are
  cast to float32), assumed to be already affinely aligned.  They may have
  different grids; origin, spacing and direction are honoured.
* ``field`` is a ``sitkVectorFloat64`` image on the *fixed* image's grid (same
  size, origin, spacing, direction) holding the ITK-convention displacement:
  the physical (LPS) vector ``d(x)`` such that the fixed-space point ``x``
  corresponds to the moving-space point ``x + d(x)``.  This is exactly what
  ``sitk.DisplacementFieldTransform`` expects, so the moving image is brought
  onto the fixed image with::

      warped = sitk.Resample(moving, fixed, sitk.DisplacementFieldTransform(field))

  (``DisplacementFieldTransform`` takes ownership of the image it is built
  from, so pass a copy, e.g. ``sitk.Image(field)``, if you still need it.)
* ``seconds`` is the wall-clock time of the registration itself (see each
  function for what is and is not counted).

These need the reference venv ``.venv-bench`` (antspyx caps numpy/scipy); see
``benchmarks/requirements-reference.txt``.  Neither function imports cyclereg.

Threads: ANTs (inside antspyx) and SimpleITK each contain their own copy of
ITK, and each reads ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS`` from the
environment once, the first time its thread pool is used in the process
(checked for both: setting it after the imports but before the first
registration works; SimpleITK ignores later changes, and ANTs most likely
does too).  Setting it before starting
Python is simplest.  ``demons_register(..., num_threads=n)`` overrides it for
the SimpleITK filters used there.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

__all__ = [
    "syn_register",
    "demons_register",
    "run_ants_registration",
    "ants_transforms_to_field",
    "sitk_to_ants",
    "ants_to_sitk",
    "SYN_DEFAULTS",
]


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def _check_3d(img: sitk.Image, name: str) -> None:
    if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(
            f"{name} must be a 3D scalar image, got dimension {img.GetDimension()} "
            f"with {img.GetNumberOfComponentsPerPixel()} components"
        )


def sitk_to_ants(img: sitk.Image):
    """SimpleITK scalar image -> float32 ANTsImage with the same physical grid.

    SimpleITK arrays are indexed [z, y, x]; ANTs arrays are indexed [x, y, z],
    hence the transpose.  Origin, spacing and the direction matrix are copied
    verbatim: both libraries use ITK's LPS physical space.
    """
    import ants

    arr = sitk.GetArrayFromImage(img).astype(np.float32, copy=False).T
    dim = img.GetDimension()
    return ants.from_numpy(
        np.ascontiguousarray(arr),
        origin=tuple(img.GetOrigin()),
        spacing=tuple(img.GetSpacing()),
        direction=np.asarray(img.GetDirection(), dtype=float).reshape(dim, dim),
    )


def ants_to_sitk(aimg) -> sitk.Image:
    """Scalar ANTsImage -> SimpleITK image with the same physical grid."""
    arr = np.ascontiguousarray(aimg.numpy().T)
    out = sitk.GetImageFromArray(arr)
    out.SetOrigin(tuple(float(v) for v in aimg.origin))
    out.SetSpacing(tuple(float(v) for v in aimg.spacing))
    out.SetDirection(tuple(float(v) for v in np.asarray(aimg.direction).ravel()))
    return out


def _dense_field(transform: sitk.Transform, reference: sitk.Image) -> sitk.Image:
    """Evaluate ``transform`` at every voxel of ``reference``; return T(x) - x.

    ``sitk.TransformToDisplacementField`` does exactly that, giving a
    sitkVectorFloat64 image on the reference grid.
    """
    field = sitk.TransformToDisplacementField(
        transform,
        sitk.sitkVectorFloat64,
        reference.GetSize(),
        reference.GetOrigin(),
        reference.GetSpacing(),
        reference.GetDirection(),
    )
    return field


def _read_ants_transform(path: str) -> sitk.Transform:
    """Read one file of an ants.registration transform list with SimpleITK.

    ``*GenericAffine.mat`` files are ITK MatrixOffsetTransform files (ITK's
    "matlab" transform format), which SimpleITK reads directly.  ``*Warp.nii.gz``
    files are ITK displacement fields (physical LPS vectors, written by ITK's
    NIfTI IO and read back unchanged by SimpleITK's identical IO), i.e. the same
    convention as ``sitk.DisplacementFieldTransform``.
    """
    if path.endswith((".mat", ".txt", ".tfm", ".h5", ".hdf5")):
        return sitk.ReadTransform(path)
    if path.endswith((".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")):
        disp = sitk.Cast(sitk.ReadImage(path), sitk.sitkVectorFloat64)
        return sitk.DisplacementFieldTransform(disp)
    raise ValueError(f"don't know how to read ANTs transform file {path!r}")


def ants_transforms_to_field(transform_list: Sequence[str] | str, fixed: sitk.Image) -> sitk.Image:
    """Dense ITK-convention displacement field on ``fixed``'s grid for an ANTs transform list.

    ``transform_list`` is ``ants.registration(...)["fwdtransforms"]`` (files
    written by ANTs), i.e. what ``ants.apply_transforms(fixed, moving,
    transform_list)`` takes.  For points, ANTs applies that list front to back:
    with ``[T0, T1, ..., Tn]`` the fixed point x maps to the moving point
    ``Tn(...T1(T0(x)))``.  (ANTs' "the last transform is applied first" wording
    is about images: the moving image is first resampled by Tn, ...)  E.g. for
    ``type_of_transform="SyN"`` the list is ``[1Warp.nii.gz, 0GenericAffine.mat]``
    and the moving point is ``A(x + w(x))``: the warp lives on the fixed grid
    and is applied first.  ``sitk.CompositeTransform`` applies the *back* of
    its list first, so it gets the reversed list.

    The composite is then evaluated at every fixed voxel centre
    (``sitk.TransformToDisplacementField``), which also puts a lone warp field
    exactly onto the fixed grid: ANTs writes warps as NIfTI, whose header keeps
    the geometry only in float32 (spacing 1.2 comes back as 1.2000000477).
    """
    if isinstance(transform_list, (str, os.PathLike)):
        transform_list = [transform_list]
    transforms = [_read_ants_transform(os.fspath(p)) for p in transform_list]
    if not transforms:
        raise ValueError("empty transform list")
    composite = sitk.CompositeTransform(transforms[::-1])
    return _dense_field(composite, fixed)


# --------------------------------------------------------------------------
# ANTs SyN
# --------------------------------------------------------------------------

#: Defaults for ``ants.registration`` in :func:`syn_register`.  They reproduce
#: the deformable (SyN) stage of antsRegistrationSyN.sh as recreated in antspyx
#: (``type_of_transform="antsRegistrationSyN[so]"``): SyN[0.2, 3, 0] with a CC
#: (local cross-correlation, radius 2 voxels) metric, four levels with shrink
#: factors 8x4x2x1 and smoothing sigmas 3x2x1x0 voxels (antspyx derives both
#: from the length of ``reg_iterations``), and 100x70x50x20 iterations (the
#: "SyNOnly" code path stops a level on a convergence window of 8 iterations at
#: 1e-7 where the [so] recreation uses 10 at 1e-6; otherwise the same).  CC is
#: the usual choice for mono-modal brain MRI (more accurate than MI there, and
#: slower); note antspyx's own "SyNOnly" default would be MI ("mattes", 32
#: bins) with (40, 20, 0) iterations, i.e. nothing at full resolution.
SYN_DEFAULTS: dict = dict(
    syn_metric="CC",
    syn_sampling=2,
    reg_iterations=(100, 70, 50, 20),
    grad_step=0.2,
    flow_sigma=3,
    total_sigma=0,
)


def run_ants_registration(
    fixed: sitk.Image,
    moving: sitk.Image,
    outprefix: str,
    *,
    type_of_transform: str = "SyNOnly",
    **kw,
) -> tuple[dict, float]:
    """``ants.registration`` on SimpleITK images, with :data:`SYN_DEFAULTS`.

    The transform files are written with ``outprefix`` and left there.  Returns
    antspyx's result dict (``fwdtransforms``, ``warpedmovout``, ...) and the
    wall-clock seconds of the ``ants.registration`` call.  Used by
    :func:`syn_register`; exposed so that tests can check the dense field
    against ``ants.apply_transforms``.
    """
    import ants

    _check_3d(fixed, "fixed")
    _check_3d(moving, "moving")
    params = {**SYN_DEFAULTS, **kw}
    afixed = sitk_to_ants(fixed)
    amoving = sitk_to_ants(moving)
    t0 = time.perf_counter()
    result = ants.registration(
        afixed,
        amoving,
        type_of_transform=type_of_transform,
        outprefix=outprefix,
        **params,
    )
    seconds = time.perf_counter() - t0
    if not result["fwdtransforms"]:
        raise RuntimeError(f"ants.registration returned no forward transforms: {result!r}")
    return result, seconds


def syn_register(
    fixed: sitk.Image,
    moving: sitk.Image,
    *,
    type_of_transform: str = "SyNOnly",
    **kw,
) -> tuple[sitk.Image, float]:
    """Register ``moving`` to ``fixed`` with ANTs SyN (antspyx).

    Parameters
    ----------
    fixed, moving
        3D scalar SimpleITK images (cast to float32), already affinely aligned.
        Their grids may differ; ANTs works in physical space.
    type_of_transform
        Passed to ``ants.registration``.  The default ``"SyNOnly"`` runs only
        the deformable stage, from an identity initial transform (ANTs still
        writes that identity as ``0GenericAffine.mat``; it is composed in like
        any other).  Any other type is allowed (e.g. ``"SyN"``, which adds a
        centre-of-mass initialisation and an affine stage, or
        ``"antsRegistrationSyN[so]"``); the whole forward transform list is
        composed into the one dense field.
    **kw
        Extra keyword arguments for ``ants.registration``; they override
        :data:`SYN_DEFAULTS` (``syn_metric="CC"``, ``syn_sampling=2``,
        ``reg_iterations=(100, 70, 50, 20)``, ``grad_step=0.2``,
        ``flow_sigma=3``, ``total_sigma=0``).  E.g. ``syn_metric="mattes",
        syn_sampling=32`` for mutual information, ``verbose=True``.
        ``outprefix`` is not accepted: the transform files go to a temporary
        directory that is deleted afterwards (use
        :func:`run_ants_registration` to keep them).

    Returns
    -------
    field
        sitkVectorFloat64 displacement field on the fixed grid, ITK convention
        (fixed point x corresponds to moving point x + field(x), physical LPS).
    seconds
        Wall-clock time of the ``ants.registration`` call alone.  That includes
        ANTs writing its transform files (compressed NIfTI) to disk, but not
        the SimpleITK<->ANTs conversion or building the returned field.
    """
    if "outprefix" in kw:
        raise TypeError("syn_register manages outprefix itself; use run_ants_registration")
    with tempfile.TemporaryDirectory(prefix="syn_register_") as tmp:
        # A fresh directory per call: antspyx finds its outputs with
        # glob(outprefix + "*[0-9]*"), so nothing else may share the prefix.
        result, seconds = run_ants_registration(
            fixed, moving, os.path.join(tmp, "reg_"), type_of_transform=type_of_transform, **kw
        )
        field = ants_transforms_to_field(result["fwdtransforms"], fixed)
    return field, seconds


# --------------------------------------------------------------------------
# SimpleITK diffeomorphic demons
# --------------------------------------------------------------------------


def _smooth_and_resample(image: sitk.Image, shrink_factor: float, smoothing_sigma: float) -> sitk.Image:
    """Gaussian-smooth (sigma in mm) then resample onto a grid shrunk by ``shrink_factor``.

    As in the SimpleITK multi-resolution demons example: same origin and
    direction, size divided by the shrink factor, spacing chosen so that the
    new grid covers the same physical extent (first and last voxel centres).
    """
    if smoothing_sigma > 0:
        image = sitk.SmoothingRecursiveGaussian(image, float(smoothing_sigma))
    if shrink_factor == 1:
        return image
    size = image.GetSize()
    spacing = image.GetSpacing()
    new_size = [max(int(sz / float(shrink_factor) + 0.5), 2) for sz in size]
    new_spacing = [((osz - 1) * ospc) / (nsz - 1) for osz, ospc, nsz in zip(size, spacing, new_size)]
    return sitk.Resample(
        image,
        new_size,
        sitk.Transform(),
        sitk.sitkLinear,
        image.GetOrigin(),
        new_spacing,
        image.GetDirection(),
        0.0,
        image.GetPixelID(),
    )


def demons_register(
    fixed: sitk.Image,
    moving: sitk.Image,
    iterations: Sequence[int] = (100, 50, 25),
    smoothing: float = 1.5,
    *,
    shrink_factors: Sequence[int] = (4, 2, 1),
    smoothing_sigmas: Sequence[float] | None = None,
    histogram_match: bool = True,
    num_threads: int | None = None,
    **kw,
) -> tuple[sitk.Image, float]:
    """Register ``moving`` to ``fixed`` with SimpleITK's diffeomorphic demons.

    Multi-resolution scheme after the SimpleITK demons example: Gaussian image
    pyramids of both images, ``DiffeomorphicDemonsRegistrationFilter`` run
    coarse to fine, the displacement field carried to the next finer level
    with ``sitk.Resample`` (linear; the vectors are physical, so they need no
    rescaling).

    Parameters
    ----------
    fixed, moving
        3D scalar SimpleITK images, already affinely aligned (cast to float32).
        Moving is first resampled onto the fixed grid (identity transform) if
        their grids differ, since the demons filter works on one grid.
    iterations
        Demons iterations per level, coarse to fine; same length as
        ``shrink_factors``.  Default (100, 50, 25).
    smoothing
        Standard deviation, in voxels of the current level, of the Gaussian
        that regularises the displacement field after every iteration
        (``SetStandardDeviations``).  Default 1.5.
    shrink_factors
        Pyramid shrink factors, coarse to fine.  Default (4, 2, 1).
    smoothing_sigmas
        Gaussian sigma in mm for each pyramid level before shrinking.  Default
        ``0.5 * shrink * max(fixed spacing)`` for shrink > 1 and 0 at full
        resolution.
    histogram_match
        Histogram-match moving to fixed first (1024 levels, 7 match points,
        threshold at mean intensity), as the SimpleITK demons examples do.
    num_threads
        If given, the number of threads for the SimpleITK filters used here.
    **kw
        Further settings of ``DiffeomorphicDemonsRegistrationFilter``, by
        setter name without "Set", case and underscores ignored, e.g.
        ``maximum_rms_error=0.0``, ``maximum_update_step_length=2.0``,
        ``smooth_update_field=True``, ``update_field_standard_deviations=1.0``,
        ``use_gradient_type=...``.  Everything else stays at ITK's defaults:
        symmetric ("ESM") forces, maximum update step 0.5 voxel, no
        update-field smoothing, and ``MaximumRMSError=0.02``, which ends a
        level early once the RMS change of the field per iteration drops below
        0.02 (on the small test images the full-resolution level stops after
        two iterations); pass ``maximum_rms_error=0`` to always run every
        iteration.

    Returns
    -------
    field
        sitkVectorFloat64 displacement field on the fixed grid, ITK convention
        (fixed point x corresponds to moving point x + field(x), physical LPS).
    seconds
        Wall-clock time from histogram matching to the finest-level result
        (histogram matching, pyramids and all demons levels).  Casting the
        inputs and the final copy onto the fixed grid are not counted.
    """
    _check_3d(fixed, "fixed")
    _check_3d(moving, "moving")
    shrink_factors = [int(s) for s in shrink_factors]
    iterations = [int(i) for i in iterations]
    if len(iterations) != len(shrink_factors):
        raise ValueError("iterations and shrink_factors must have the same length")
    if smoothing_sigmas is None:
        max_spacing = max(fixed.GetSpacing())
        smoothing_sigmas = [0.5 * s * max_spacing if s > 1 else 0.0 for s in shrink_factors]
    smoothing_sigmas = [float(s) for s in smoothing_sigmas]
    if len(smoothing_sigmas) != len(shrink_factors):
        raise ValueError("smoothing_sigmas and shrink_factors must have the same length")

    def configure(obj):
        if num_threads is not None:
            obj.SetNumberOfThreads(int(num_threads))
        return obj

    demons = configure(sitk.DiffeomorphicDemonsRegistrationFilter())
    demons.SetSmoothDisplacementField(True)
    demons.SetStandardDeviations(float(smoothing))
    setters = {name[3:].lower(): name for name in dir(demons) if name.startswith("Set")}
    for key, value in kw.items():
        name = setters.get(key.replace("_", "").lower())
        if name is None:
            raise TypeError(f"DiffeomorphicDemonsRegistrationFilter has no setting {key!r}")
        getattr(demons, name)(value)

    fixed_f = sitk.Cast(fixed, sitk.sitkFloat32)
    moving_f = sitk.Cast(moving, sitk.sitkFloat32)
    same_grid = (
        fixed.GetSize() == moving.GetSize()
        and np.allclose(fixed.GetOrigin(), moving.GetOrigin())
        and np.allclose(fixed.GetSpacing(), moving.GetSpacing())
        and np.allclose(fixed.GetDirection(), moving.GetDirection())
    )
    if not same_grid:
        moving_f = sitk.Resample(moving_f, fixed_f, sitk.Transform(), sitk.sitkLinear, 0.0)

    t0 = time.perf_counter()
    if histogram_match:
        matcher = configure(sitk.HistogramMatchingImageFilter())
        matcher.SetNumberOfHistogramLevels(1024)
        matcher.SetNumberOfMatchPoints(7)
        matcher.ThresholdAtMeanIntensityOn()
        moving_f = matcher.Execute(moving_f, fixed_f)

    field = None
    for shrink, sigma, n_iter in zip(shrink_factors, smoothing_sigmas, iterations):
        f_level = _smooth_and_resample(fixed_f, shrink, sigma)
        m_level = _smooth_and_resample(moving_f, shrink, sigma)
        if field is None:
            field = sitk.Image(f_level.GetSize(), sitk.sitkVectorFloat64, 3)
            field.CopyInformation(f_level)
        else:
            field = sitk.Resample(field, f_level, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
        if n_iter > 0:
            demons.SetNumberOfIterations(n_iter)
            field = demons.Execute(f_level, m_level, field)
    seconds = time.perf_counter() - t0

    field = sitk.Cast(field, sitk.sitkVectorFloat64)
    if field.GetSize() != fixed.GetSize() or not np.allclose(field.GetSpacing(), fixed.GetSpacing()):
        # last level was not full resolution: interpolate onto the fixed grid
        field = sitk.Resample(field, fixed, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
    # make the geometry bit-identical to fixed (the full-resolution level of the
    # pyramid is the fixed image itself, so this only drops rounding noise)
    field.CopyInformation(fixed)
    return field, seconds
