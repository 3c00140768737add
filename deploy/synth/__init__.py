"""Synthetic freehand breast-ultrasound sweeps with BI-RADS-lexicon lesions.

The generator behind ``busfed synth``: rehearsal sites, the demo's hospitals, tests and
benchmarks. No site or server runs it, so it lives in ``deploy/``, outside the Flower app
bundle. A site dataset is generated in stages, one module each:

``sample_lesion, sample_anatomy, fake_identity -> render_sweep -> generate_site``

1. ``lesion``: ``sample_lesion`` draws a patient's age, the lesion's size and its BI-RADS
   lexicon features, then the malignancy label from a documented logistic model of the
   features (``INTERCEPT``, ``LOG_ODDS``). A share of patients (``normal_fraction``) have
   no lesion.
2. ``anatomy``: ``sample_anatomy`` draws the patient's layers from the skin down (skin,
   subcutaneous fat, fibroglandular tissue, retromammary fat, pectoralis major);
   ``scanner``: ``fake_identity`` the made-up name, ID and exam date that the scanner
   burns into the top of every frame, in the style of one of the ``VENDORS``.
3. ``sweep``: ``render_sweep`` images one freehand sweep with the convolution model of
   fully developed speckle (``physics``), in stages: plan the probe's path (image-plane
   direction, skew, speed, whether it passes over a rib), build the echogenicity volume
   (layers, lesion, rib), draw the speckle (``speckle_iq``), cast acoustic shadows and
   enhancement, then the scanner's processing (``focus_beam``: focal zone and spatial
   compounding; ``receive``: attenuation, electronic noise, time-gain compensation,
   envelope, log compression) and the burned-in header.
4. ``site``: ``generate_site`` writes ``videos/*.mp4``, ``manifest.csv``, ``boxes.csv`` and
   ``lesions.csv``.

``sheet`` is ``busfed synth-sheet``, a contact sheet of rendered frames per vendor.

Everything is drawn from ``numpy.random.default_rng`` streams derived from ``(seed, site)``
by ``numpy.random.SeedSequence``, so the same arguments give the same bytes.
"""

from deploy.synth.anatomy import Anatomy, sample_anatomy
from deploy.synth.lesion import LOG_ODDS, Lesion, malignancy_probability, sample_lesion
from deploy.synth.physics import Psf, focus_beam, receive, speckle_envelope, speckle_iq
from deploy.synth.scanner import (
    VENDORS,
    PatientIdentity,
    VendorPreset,
    fake_identity,
    header_band,
    vendor_preset,
)
from deploy.synth.site import LESION_COLUMNS, SiteSummary, generate_site
from deploy.synth.sweep import Sweep, SweepPath, render_sweep

__all__ = [
    "LESION_COLUMNS",
    "LOG_ODDS",
    "VENDORS",
    "Anatomy",
    "Lesion",
    "PatientIdentity",
    "Psf",
    "SiteSummary",
    "Sweep",
    "SweepPath",
    "VendorPreset",
    "fake_identity",
    "focus_beam",
    "generate_site",
    "header_band",
    "malignancy_probability",
    "receive",
    "render_sweep",
    "sample_anatomy",
    "sample_lesion",
    "speckle_envelope",
    "speckle_iq",
    "vendor_preset",
]
