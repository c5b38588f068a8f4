"""ptylive.daemon"""
