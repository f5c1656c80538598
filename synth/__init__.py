"""Synthetic prostate mpMRI studies (real DICOM files) with ground truth. No patient data is used."""
