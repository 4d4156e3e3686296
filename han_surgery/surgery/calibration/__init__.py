"""Calibrated surgery: fit each new Han-block to the pretrained block it replaces.

``hanify(model, config, calibration=batches)`` swaps the blocks in one at a time, in
model order; each is fitted (closed-form start, then a short Adam run) to what the
original block computed on the inputs that the already-fitted blocks produce, and
optionally the whole model is then healed by hidden-state distillation. See
``docs/CALIBRATION.md`` for the method and the measurements.

Public API:

* :class:`CalibrationConfig` -- the fitting settings (recorded in the recipe);
* :func:`calibration_batches` -- a data file -> calibration batches (:class:`CalibrationData`: its arguments);
  :func:`with_decoder_inputs` adds an encoder-decoder's decoder inputs to them;
* :func:`hidden_state_distillation_loss`, :class:`HiddenStates` -- hidden-state
  distillation for a fine-tune loop;
* :class:`CalibrationReport`, :class:`BlockFit` -- what the fit achieved, per block;
* :class:`CalibrationSite`, :class:`CalibratedReplacement` -- for rule authors.
"""

from .calibrate import calibrate_rewrites, check_batches
from .config import CalibrationConfig
from .data import CalibrationData, calibration_batches, read_texts, with_decoder_inputs
from .fit import closed_form_start, fvu
from .heal import HiddenStates, heal, hidden_state_distillation_loss, hidden_state_paths
from .record import CalibrationBatchError, CalibrationDataError, TokenReservoir, call_model, record_inputs
from .report import BlockFit, CalibrationReport
from .site import CalibratedReplacement, CalibrationSite, PixelRows, SequenceRows

__all__ = [
    "CalibrationConfig",
    "CalibrationData",
    "CalibrationReport",
    "BlockFit",
    "CalibrationSite",
    "CalibratedReplacement",
    "CalibrationDataError",
    "CalibrationBatchError",
    "PixelRows",
    "SequenceRows",
    "TokenReservoir",
    "calibrate_rewrites",
    "calibration_batches",
    "call_model",
    "check_batches",
    "closed_form_start",
    "fvu",
    "heal",
    "hidden_state_distillation_loss",
    "hidden_state_paths",
    "HiddenStates",
    "read_texts",
    "record_inputs",
    "with_decoder_inputs",
]
