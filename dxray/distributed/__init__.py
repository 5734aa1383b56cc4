"""The audit on Ray: explainer and segmenter actors, the scheduler, and cluster connection."""
