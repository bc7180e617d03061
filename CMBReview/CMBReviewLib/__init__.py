"""CMBReview core: expert labelling, triage of detections and reader agreement."""
