"""Torch-free postprocessing: lesion candidates from the fused map, the findings report, DICOM SEG and SR."""
