"""The HTTP layer: an app factory and one router per endpoint family; no model loading here."""
