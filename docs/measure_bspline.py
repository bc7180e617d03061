"""Does a coarse B-spline stage after the affine pay in MARS region agreement? Same cases as
measure_regions.py (seed 11, 0-5). Run from the repository root (needs nilearn):

    PYTHONPATH=CMBDetect python docs/measure_bspline.py

The B-spline: about one span per 50 mm over the scan (4 control points a side at 150 mm), at
4 mm (shrink 2 of the 2 mm working image), L-BFGS-B, 20 iterations, Mattes MI, on top of the
affine fit of anatomy/register.py. Prints region and side agreement and the error of the mapped
bleed centres against their MNI positions, affine alone and with the B-spline (docs/regions.md).
"""

import time, numpy as np, SimpleITK as sitk
from CMBDetectLib.anatomy.register import register_to_template, WORKING_MM, SEED
from CMBDetectLib.anatomy.atlas import load_atlas, lps_to_mni
from CMBDetectLib.registration.rigid import float_image
from CMBDetectLib.synth.case import generate_case
atlas = load_atlas()
def bspline(fixed, moving, affine, iters):
    mesh = [max(1, int(round(n * s / 50.0 * 3))) for n, s in zip(fixed.GetSize(), fixed.GetSpacing())]
    bs = sitk.BSplineTransformInitializer(fixed, [max(1, m // 3) * 1 for m in mesh])  # ~1 span per 50 mm -> 4 control points
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(32)
    reg.SetMetricSamplingStrategy(reg.RANDOM); reg.SetMetricSamplingPercentage(0.2, SEED)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=iters, maximumNumberOfCorrections=5)
    reg.SetShrinkFactorsPerLevel([2]); reg.SetSmoothingSigmasPerLevel([1.0]); reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetMovingInitialTransform(affine)
    reg.SetInitialTransform(bs, inPlace=True)
    th = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads(); sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try: reg.Execute(fixed, moving)
    finally: sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(th)
    comp = sitk.CompositeTransform([affine, bs])
    return comp, reg.GetMetricValue()
res = {"affine": [], "bspline": []}; tb=[]
for index in range(6):
    kind = ("axial", "oblique", "partial")[index % 3]
    space = {"p_oblique": 1.0 if kind == "oblique" else 0.0, "p_motion": 0.0, "coverage_mm": (60.0, 90.0) if kind == "partial" else (140.0, 160.0)}
    case = generate_case(11, index, matrix=(160, 160), space=space)
    L = case.meta["lesions"]; pts = np.array([l["centre_lps"] for l in L])
    r = register_to_template(case.image)
    fixed = float_image(case.image, WORKING_MM)
    t = time.perf_counter(); comp, m = bspline(fixed, atlas.head, r.transform, 20); tb.append(time.perf_counter() - t)
    for name, tr in (("affine", r.transform), ("bspline", comp)):
        mapped = np.array([tr.TransformPoint(tuple(map(float, p))) for p in pts])
        locs = atlas.locate(mapped)
        for l, g, mm in zip(L, locs, lps_to_mni(mapped)):
            res[name].append((g.mars_region == l["mars_region"], g.side == l["side"], np.linalg.norm(mm - np.array(l["centre_mni_approx"]))))
    print(index, kind, "affine MI %.3f bspline MI %.3f, %.1f s" % (r.metric, m, tb[-1]), flush=True)
for name, v in res.items():
    a = np.array(v); print(name, "region %.3f side %.3f error median %.1f p90 %.1f mm" % (a[:,0].mean(), a[:,1].mean(), np.median(a[:,2]), np.percentile(a[:,2], 90)))
print("bspline seconds median %.1f" % np.median(tb))
