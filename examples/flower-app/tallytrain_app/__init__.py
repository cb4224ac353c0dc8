"""tallytrain on Flower: the app's entry points (the logic is tallytrain.flower)."""
