"""Registration between scans: one module that detection (locations) and longitudinal comparison
share. It returns transforms and QC scores, never resampled copies the caller did not ask for."""
