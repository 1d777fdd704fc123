"""What device firmware speaks (line codecs, framed binary, Modbus register maps), turned into readings."""
