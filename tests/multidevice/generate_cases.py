"""What `test_generate_mesh.py` and its 8-device worker share: the meshes, the prompts."""
# data x tensor x expert; expert parallel with the batch padded (3 rows -> 8); tensor x data.
MESHES = ('data=2,tensor=2,expert=2', 'expert=4,data=2', 'tensor=2,data=4')
# Refused before any weight is read: 4 experts over 8 devices; an unknown axis; 8 != 4 devices.
REFUSED = {
    'expert=8': 'config.model.num_experts=4: must be divisible by config.mesh.expert=8',
    'data=2,pipeline=4': "unknown axis 'pipeline'",
    'data=2,tensor=2': '4 devices, but there are 8',
}
PROMPTS = [[5, 17, 3, 80, 41], [9, 2], [60, 61, 62, 63, 64, 65, 66, 67]]
NEW = 5
