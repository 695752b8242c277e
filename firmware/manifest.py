# Freeze the terminal firmware into a Pico build:
#   make -C ports/rp2 BOARD=RPI_PICO FROZEN_MANIFEST=/path/to/vitals/firmware/manifest.py
# (hal_unix.py is left out: it is the unix port's backend.) The frozen modules are the
# factory image (slot a); an update's slot directory comes first on sys.path.
metadata(description="vitals terminal firmware: Modbus RTU sound level meter", version="1.0.0")

include("$(PORT_DIR)/boards/manifest.py")
module("regmap.py")
module("rtu_slave.py")
module("settings.py")
module("slm.py")
module("device.py")
module("hal_rp2.py")
module("app.py")
module("bootloader.py")
module("main.py")
