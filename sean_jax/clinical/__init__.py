"""Clinical post-processing: brain masks, confinement and component-size filtering."""
