"""Models built on moekit layers."""
